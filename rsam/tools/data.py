"""``rsam-data``: check a dataset before training on it, or convert it to the ``jsonl`` format.

    rsam-data check --format rrsisd data/RRSIS-D [--json] [--vocab checkpoints/bert-base-uncased/vocab.txt]
    rsam-data convert --format refsegrs data/RefSegRS --out data/refsegrs_jsonl

``check`` reads everything -- every image header, every expression, every mask -- and reports per split the
images, expressions and no-target expressions, and every problem. Errors are what a loader would reject
(missing or unreadable files, malformed records, masks of another size than their image); warnings are what it
handles or what deserves a look (masks resized to their image, empty masks, duplicate expressions, texts
longer than the tokenizer keeps, one image in two splits). With ``--json`` stdout is exactly one JSON object.
Exit status: 0 trainable (warnings allowed), 1 errors, 2 unreadable (wrong layout, refused pickle: one line
``rsam-data: error: <file>: <why>`` on stderr, or the JSON object with ``--json``) and usage errors.

``convert`` writes ``OUT/manifest.jsonl`` (masks at each image's own size after the fixes above, image paths
pointing at the original files); expressions with errors are left out and reported (exit 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from rsam.atomic_files import atomic_path
from rsam.cli import run_command, user_error_line
from rsam.data.errors import DataError
from rsam.data.readers import FORMATS, reader_class
from rsam.data.rle import encode_rle
from rsam.data.safe_pickle import PickleRefused
from rsam.errors import UserError

__all__ = ["main", "scan", "ScanReport"]

WARNING_KINDS = ("mask_resized", "empty_mask", "duplicate_expression", "text_too_long", "image_in_two_splits")
DEFAULT_VOCAB = "checkpoints/bert-base-uncased/vocab.txt"


@dataclass
class ScanReport:
    format: str
    root: str
    splits: Dict[str, Dict[str, int]] = field(default_factory=dict)
    problems: List[Dict[str, str]] = field(default_factory=list)
    unreadable: bool = False
    unreadable_reason: str = ""  # the one-line error that made the dataset unreadable
    _reported: set = field(default_factory=set, repr=False)

    def add(self, kind: str, path: str, detail: str) -> None:
        # Single-file formats re-read their whole file for every split: a record no split owns is reported once.
        if (kind, path, detail) not in self._reported:
            self._reported.add((kind, path, detail))
            self.problems.append({"kind": kind, "path": path, "detail": detail})

    @property
    def warnings(self) -> int:
        return sum(p["kind"] in WARNING_KINDS for p in self.problems)

    @property
    def errors(self) -> int:
        return len(self.problems) - self.warnings

    def as_json(self) -> dict:
        return {"format": self.format, "root": self.root, "splits": self.splits, "problems": self.problems,
                "errors": self.errors, "warnings": self.warnings}

    def exit_status(self) -> int:
        return 2 if self.unreadable else (1 if self.errors else 0)


def _error_kind(err: DataError) -> str:
    return {"missing_file": "missing_file", "image": "unreadable_file", "json": "malformed_record",
            "field": "malformed_record", "size": "size_mismatch", "description": "empty_text",
            "no_annotations": "no_expression"}.get(err.reason, err.reason)


def scan(format: str, root: str, options: Optional[dict] = None, token_counter: Optional[Callable] = None,
         max_tokens: int = 47, on_expression: Optional[Callable] = None) -> ScanReport:
    """Read the whole dataset; ``on_expression(split, reader, name, ann, mask, (h, w))`` sees every usable
    expression (mask None for no-target ones). ``token_counter(texts) -> lengths`` enables the length check."""
    options = dict(options or {})
    report = ScanReport(format, root)
    cls = reader_class(format)
    try:
        splits = cls.available_splits(root, **options)
    except (DataError, PickleRefused, FileNotFoundError, ValueError) as e:
        return _unreadable(report, e, root)
    image_splits: Dict[str, set] = {}
    for split in splits:
        try:
            reader = cls(root, split, **options)
        except (DataError, PickleRefused, FileNotFoundError, ValueError) as e:
            return _unreadable(report, e, root)
        for err in reader.problems:
            report.add(_error_kind(err), err.path, err.problem)
        counts = {"images": 0, "expressions": 0, "no_target": 0}
        for name in reader.names:
            try:
                _scan_image(reader, split, name, report, counts, token_counter, max_tokens, on_expression)
            except Exception as e:  # a malformed record the reader did not foresee: reported, the scan goes on
                report.add("malformed_record", reader.image_path(name), f"{type(e).__name__}: {e}")
            image_splits.setdefault(reader.image_path(name), set()).add(split)
        report.splits[split] = counts
    if not any(c["expressions"] for c in report.splits.values()):
        report.add("no_expression", root, f"no usable expression in the splits {splits}")
    for path, found in sorted(image_splits.items()):
        if len(found) > 1:
            report.add("image_in_two_splits", path, f"listed in the splits {sorted(found)}")
    return report


def _unreadable(report: ScanReport, err: Exception, root: str) -> ScanReport:
    report.unreadable, report.unreadable_reason = True, user_error_line(err)
    report.add("unreadable_dataset", getattr(err, "path", root), report.unreadable_reason)
    return report


def _scan_image(reader, split, name, report, counts, token_counter, max_tokens, on_expression) -> None:
    def bad(err: DataError) -> None:
        report.add(_error_kind(err), err.path, err.problem)

    problems_before = len(report.problems)

    try:
        image = reader.open_image(name)
        reader.decode_image(name, image)  # the pixels too: a truncated file fails here, not in training
        anns = reader.load_annotations(name, on_bad_record=bad, keep_empty=True)
    except DataError as e:
        bad(e)
        return
    size = (image.height, image.width)
    usable, seen, resized = [], {}, []
    for ann in anns:
        key = " ".join(ann.description.lower().split())
        if key in seen:
            report.add("duplicate_expression", reader.annotation_path(name),
                       f"{name}: expressions {seen[key]} and {ann.index} are both {ann.description!r}")
        seen.setdefault(key, ann.index)
        if ann.no_target:
            usable.append((ann, None))
            continue
        err = reader.size_mismatch(name, ann, size)
        if err is not None:
            bad(err)
            continue
        stored = reader.mask_size(name, ann)
        try:
            mask = reader.decode_masks(name, [ann], size)[0]
        except DataError as e:
            bad(e)
            continue
        if reader.resize_masks and stored is not None and tuple(stored) != size:
            resized.append(list(stored))
        if not mask.any():
            report.add("empty_mask", reader.annotation_path(name), f"{name}: expression {ann.index} "
                                                                   f"({ann.description!r}) has an empty mask")
        usable.append((ann, mask))
    if resized:
        report.add("mask_resized", reader.image_path(name), f"{len(resized)} mask(s) of size {resized[0]} resized "
                                                           f"to the image size {list(size)} (nearest)")
    if not usable:
        if len(report.problems) == problems_before:  # otherwise the reason is already reported
            report.add("no_expression", reader.annotation_path(name), f"{name}: no usable expression")
        return
    if token_counter is not None:
        for (ann, _), n in zip(usable, token_counter([a.description for a, _ in usable])):
            if n > max_tokens:
                report.add("text_too_long", reader.annotation_path(name), f"{name}: expression {ann.index} has {n} "
                                                                          f"tokens > {max_tokens}, truncated")
    counts["images"] += 1
    counts["expressions"] += len(usable)
    counts["no_target"] += sum(m is None or not m.any() for _, m in usable)
    if on_expression is not None:
        for ann, mask in usable:
            on_expression(split, reader, name, ann, mask, size)


def _token_counter(vocab: Optional[str], root: str = "") -> Tuple[Optional[Callable], str]:
    """(texts -> token counts, or None; the note to print when the lengths cannot be checked). Without
    ``--vocab``: the dataset's own ``vocab.txt`` (the synthetic datasets ship one), else DEFAULT_VOCAB."""
    beside = os.path.join(root, "vocab.txt") if root else ""
    path = vocab or next((p for p in (beside, DEFAULT_VOCAB) if p and os.path.isfile(p)), None)
    if path is None:
        return None, (f"rsam-data: no vocabulary (--vocab, {beside or '<root>/vocab.txt'} or {DEFAULT_VOCAB}): "
                      "token lengths are not checked")
    from rsam.data.tokenizer import load_bert_tokenizer

    tokenizer = load_bert_tokenizer(path)
    return lambda texts: [len(p) + 2 for p in tokenizer(list(texts), add_special_tokens=False)["input_ids"]], ""


def _print_report(report: ScanReport, stream=sys.stdout, limit: int = 10) -> None:
    print(f"{report.format} dataset at {report.root}", file=stream)
    for split, c in report.splits.items():
        print(f"  {split:>8}: {c['images']} images, {c['expressions']} expressions, {c['no_target']} no-target",
              file=stream)
    kinds: Dict[str, List[dict]] = {}
    for p in report.problems:
        kinds.setdefault(p["kind"], []).append(p)
    for kind, items in kinds.items():
        level = "warning" if kind in WARNING_KINDS else "error"
        print(f"{level}: {kind} x{len(items)}", file=stream)
        for p in items[:limit]:
            print(f"    {p['path']}: {p['detail']}", file=stream)
        if len(items) > limit:
            print(f"    ... and {len(items) - limit} more", file=stream)
    print(f"{report.errors} errors, {report.warnings} warnings", file=stream)


def _convert(args, options) -> ScanReport:
    target = os.path.join(args.out, "manifest.jsonl")
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        def write(split, reader, name, ann, mask, size):
            record = {"image": os.path.abspath(reader.image_path(name)) if "://" not in reader.root
                      else reader.image_path(name), "height": size[0], "width": size[1], "split": split,
                      "text": ann.description, "mask": None if mask is None else encode_rle(mask),
                      "category": ann.category,
                      "source": {"dataset": args.format, "id": ann.source_id or f"{name}:{ann.index}"}}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

        report = scan(args.format, args.root, options, on_expression=write)
        if report.unreadable:  # leaves no manifest behind
            raise UserError(report.unreadable_reason)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsam-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("check", "convert"):
        c = sub.add_parser(name)
        c.add_argument("--format", required=True, choices=sorted(FORMATS))
        c.add_argument("root", help="dataset root")
        c.add_argument("--dataset-name", default=None, help="rrsisd: <name>/ folder (default rrsisd)")
        c.add_argument("--split-by", default=None, help="rrsisd: refs(<split_by>).p (default unc)")
        c.add_argument("--prefix", default=None, help="rrsisd: file-name prefix (NWPU-Refer: new_)")
        c.add_argument("--shared-text", choices=("separate", "union"), default=None,
                       help="rrsisd: refs of one image sharing a text are one expression (union)")
        if name == "check":
            c.add_argument("--json", action="store_true", help="stdout: exactly one JSON object")
            c.add_argument("--vocab", default=None, help=f"BERT vocab for the length check (default {DEFAULT_VOCAB})")
            c.add_argument("--max-tokens", type=int, default=47, help="tokenizer limit incl. [CLS] and [SEP]")
        else:
            c.add_argument("--out", required=True, help="output folder for manifest.jsonl")
    return p


def _run(args) -> int:
    options = {k: v for k, v in (("dataset_name", args.dataset_name), ("split_by", args.split_by),
                                 ("prefix", args.prefix), ("shared_text", args.shared_text)) if v is not None}
    if options and args.format != "rrsisd":
        raise UserError(f"{sorted(options)} only apply to --format rrsisd")
    if args.command == "check":
        counter, note = _token_counter(args.vocab, args.root)
        report = scan(args.format, args.root, options, counter, args.max_tokens)
        if note and not report.unreadable:  # an unreadable dataset is one line (below)
            print(note, file=sys.stderr)
        if args.json:
            print(json.dumps(report.as_json()))
        elif report.unreadable:  # one line on stderr, exit 2 (rsam/cli.py)
            raise UserError(report.unreadable_reason)
        else:
            _print_report(report)
    else:
        report = _convert(args, options)
        _print_report(report, sys.stderr)
        print(f"wrote {os.path.join(args.out, 'manifest.jsonl')}", file=sys.stderr)
    return report.exit_status()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("rsam-data", lambda: _run(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
