"""rsam-ui: a local web demo (Gradio) -- an image, referring expressions, and each mask in its caption colour.

    pip install -e ".[ui]"
    rsam-ui --checkpoint rsam_logs/exp/checkpoints/best.pt            # then open http://127.0.0.1:7860
    rsam-ui --checkpoint export_dir/ --examples data/demo/JPEGImages --port 8080 --device cpu
    rsam-ui --checkpoint official.pt --config configs/rsam_b+_b_official.yaml

--checkpoint: a training checkpoint, an official RSAM checkpoint with --config, a pretrained directory
(``config.json`` + ``model.safetensors``, see rsam-export) or a Hugging Face Hub repo id ("user/name", read
through the standard HF cache; ``HF_HUB_OFFLINE=1`` with a filled cache works offline). The model is loaded
once, before the server starts; requests only run the predictor (one at a time: it holds the current image).

--examples DIR: the images of DIR (sorted, at most 48) offered as examples; a ``<image stem>.txt`` next to an
image fills the expression box with its lines when that example is picked.

The page: upload or pick an image, type one or more expressions (one per line), press Segment. Output: the
image with each mask drawn in its own colour (Fill or Outline; optionally beside the untouched input), a table
of expression / colour / predicted IoU / object score / no-target flag / mask area, and one mask PNG per
expression (0 / 255, at the image's size) to download. What a request may cost is bounded (:class:`Limits`):
upload size (refused by the server), pixels, expressions per request and characters per expression; every
refusal (a limit, a file that is not an image) is one message in the page and one line in the server's log,
never a traceback. An expression whose mask came out empty says so ("empty mask") in the table and the caption.
Uploads, Gradio's copies and mask PNGs live in one private temporary folder, removed when the server stops
(Ctrl-C, SIGTERM) or the process exits.

Offline and private by default: Gradio analytics and version checks are off, all assets are served by the
local server (no CDN, system fonts), the server listens on 127.0.0.1, and no public share link is created
unless ``--share`` is given. Exit status: 0 after the server stops, 2 for a usage error (one line on stderr:
missing checkpoint, unavailable device, Gradio not installed, port in use).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Optional, Sequence

from rsam.cli import run_command
from rsam.tools.ui_app import (  # noqa: F401  (re-exported: the handler and the app live in ui_app)
    Limits,
    Segmenter,
    SegmentResult,
    UIError,
    UsageError,
    _model_line,
    build_app,
    close,
    find_examples,
    launch,
    scores_html,
)

__all__ = ["Limits", "UIError", "Segmenter", "build_app", "launch", "load_predictor", "find_examples", "main"]

UI_HINT = "rsam-ui needs Gradio: pip install \"rsam[ui]\" (or pip install \"gradio>=4\")"
_Usage = UsageError


# ------------------------------------------------------------------------------------------------ CLI


def _device(text: Optional[str]):
    import torch

    from rsam.tools.predict_inputs import UsageError as InputUsageError, parse_device

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return parse_device(text)
    except InputUsageError as exc:
        raise _Usage(str(exc)) from None


def load_predictor(checkpoint: str, config: Optional[str] = None, device: Any = None):
    """The predictor of anything ``--checkpoint`` takes (:func:`rsam.checkpoint.read_checkpoint` decides what it
    is: a checkpoint file, with ``config`` for an official one, a pretrained directory or a Hub repo id)."""
    from rsam.predictor import RSAMPredictor

    if config is not None and not os.path.isfile(os.path.expanduser(config)):
        raise _Usage(f"--config {config}: no such file")
    return RSAMPredictor.load(os.path.expanduser(checkpoint), config=config, device=device)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsam-ui", description="RSAM web demo (Gradio) on a local server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint, pretrained directory (config.json + model.safetensors) or Hub repo id")
    p.add_argument("--config", default=None, help="model config (official checkpoints without a stored config)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--examples", default=None, help="folder of example images (<stem>.txt: their expressions)")
    p.add_argument("--share", action="store_true", help="also create a public Gradio share link (needs internet)")
    d = Limits()
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb, help="largest upload")
    p.add_argument("--max-megapixels", type=float, default=d.max_pixels / 1e6, help="largest image")
    p.add_argument("--max-expressions", type=int, default=d.max_expressions, help="expressions per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per expression")
    return p.parse_args(argv)


def _log_to_stderr() -> None:
    """One line per refused or failed request on stderr (rsam/tools/ui_app.py logs them to "rsam.ui")."""
    log = logging.getLogger("rsam.ui")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s rsam-ui: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the server the way Ctrl-C does, so that its files are removed (see :func:`close`)."""
    raise KeyboardInterrupt


def _run(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        raise _Usage(f"--port {args.port}: use 1-65535")
    if args.max_file_mb <= 0 or args.max_megapixels <= 0 or args.max_expressions < 1 or args.max_chars < 1:
        raise _Usage("--max-file-mb, --max-megapixels, --max-expressions and --max-chars must be positive")
    limits = Limits(args.max_file_mb, int(args.max_megapixels * 1e6), args.max_expressions, args.max_chars)
    examples = find_examples(args.examples)
    device = _device(args.device)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (before the model loads: a missing extra is a usage error)
    except ImportError:
        raise _Usage(UI_HINT) from None
    predictor = load_predictor(args.checkpoint, args.config, device)
    _log_to_stderr()
    app = build_app(predictor, examples, limits)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    print(f"rsam-ui: {args.checkpoint} loaded ({_model_line(predictor)}); http://{args.host}:{args.port}",
          file=sys.stderr)
    try:
        launch(app, args.host, args.port, share=args.share)
    except OSError:  # port in use, address not available
        raise _Usage(f"cannot listen on {args.host}:{args.port} (port in use or address not available): pick "
                     "another with --port / --host") from None
    except KeyboardInterrupt:
        pass
    finally:
        close(app)
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``rsam-ui``): 0 after the server stops, 2 on a usage error."""
    return run_command("rsam-ui", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
