"""The web demo's app: request handling (:class:`Segmenter`, :class:`Limits`) and the Gradio page
(:func:`build_app`, :func:`launch`). The command line is :mod:`rsam.tools.ui` (``rsam-ui``), which documents
what the page does.

Only :func:`build_app` and :func:`launch` import Gradio; :meth:`Segmenter.run` (one request -> overlay, table
rows, mask PNGs, or a :class:`UIError`) and :meth:`Segmenter.__call__` (the page's callback: a refusal becomes a
message in the page and one log line) need numpy, Pillow and the predictor.

Files: every upload, Gradio copy and mask PNG of a server lives in one private folder (``app.rsam_upload_dir``,
Gradio's ``GRADIO_TEMP_DIR``), removed by :func:`close` and, failing that, when the process exits.
"""
from __future__ import annotations

import atexit
import hashlib
import html
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from rsam.errors import UserError
from rsam.tools.output_names import slug

__all__ = ["Limits", "UIError", "UsageError", "Segmenter", "SegmentResult", "scores_html", "message_html",
           "find_examples", "build_app", "launch", "close"]

LOG = logging.getLogger("rsam.ui")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MAX_EXAMPLES = 48
KEEP_REQUESTS = 16  # request folders of mask PNGs kept on disk (older ones are deleted)
STYLE_CHOICES = ("Outline", "Fill")
TABLE_ID = "rsam-scores"
MESSAGE_ID = "rsam-message"
NOT_AN_IMAGE = "this file is not an image we can read"


class UIError(ValueError):
    """A request the demo refuses; the message is shown in the page as it is."""


class UsageError(UserError):
    """A command-line usage error (bad --examples folder, ...): one line on stderr, exit status 2."""


@dataclass(frozen=True)
class Limits:
    """What one request may cost. ``max_file_mb`` is enforced by the server on upload (Gradio's
    ``max_file_size``); the others by :meth:`Segmenter.run` before the model sees anything."""

    max_file_mb: float = 20.0
    max_pixels: int = 25_000_000
    max_expressions: int = 16
    max_chars: int = 200

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def describe(self) -> str:
        return (f"at most {self.max_file_mb:g} MB and {self.max_pixels / 1e6:g} megapixels per image, "
                f"{self.max_expressions} expressions of at most {self.max_chars} characters each")


# ------------------------------------------------------------------------------------------------ requests


def _unreadable(name: str, exc: BaseException, path: str) -> UIError:
    """The page's message for a file that is not a usable image: its upload name and the reason, without the
    server's temporary path (PIL and the predictor name the file they opened)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        reason = "not a picture format we know (PNG, JPEG, TIFF, BMP, WebP)"
    else:
        reason = str(exc).replace(path, name).strip() or type(exc).__name__
        folder = os.path.dirname(path)
        reason = reason.replace(folder + os.sep, "") if folder else reason
        reason = reason.replace(f"{name}: ", "", 1)
    return UIError(f"{NOT_AN_IMAGE}: {name} ({reason})")


def _image_size(image: Any, name: str = "") -> Tuple[int, int]:
    """(W, H) of an image without decoding its pixels where it is a file (only the header is read);
    ``name``: how the page calls the file (its upload name)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        name = name or os.path.basename(path)
        if not os.path.isfile(path):
            raise UIError(f"image not found: {name}")
        try:
            with Image.open(path) as im:
                return int(im.size[0]), int(im.size[1])
        except Image.DecompressionBombError:
            raise UIError(f"{name}: the image has far too many pixels to be opened") from None
        except Exception as exc:  # unreadable or not an image: PIL's own error types vary
            raise _unreadable(name, exc, path) from None
    if isinstance(image, Image.Image):
        return int(image.size[0]), int(image.size[1])
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) < 2:
        raise UIError(f"expected an image, got {type(image).__name__}")
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):  # (C, H, W)
        return int(shape[2]), int(shape[1])
    return int(shape[1]), int(shape[0])


def _fingerprint(image: Any) -> Optional[str]:
    """A content hash, so that a second request on the same image reuses its features."""
    h = hashlib.sha1()
    try:
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        elif isinstance(image, np.ndarray):
            h.update(str((image.shape, image.dtype)).encode())
            h.update(np.ascontiguousarray(image).tobytes())
        else:
            return None
    except OSError:
        return None
    return h.hexdigest()


def _parse_texts(text: Optional[str], limits: Limits) -> List[str]:
    texts = [line.strip() for line in (text or "").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise UIError("type at least one expression (one per line)")
    if len(texts) > limits.max_expressions:
        raise UIError(f"{len(texts)} expressions: at most {limits.max_expressions} per request")
    for i, t in enumerate(texts, 1):
        if len(t) > limits.max_chars:
            raise UIError(f"expression {i} has {len(t)} characters: at most {limits.max_chars}")
    return texts


def _hex(color: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in color[:3])


def _slug(text: str, limit: int = 40) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    out = "-".join(p for p in out.split("-") if p)
    return out[:limit].rstrip("-") or "expression"


def _outcome(no_target: bool, area_px: int) -> str:
    """What a prediction found, in words: a table cell and a caption line say it the same way."""
    if no_target:
        return "no target"
    return "empty mask" if area_px == 0 else "found"


def _detail(p, area_px: int) -> str:
    """The overlay caption's second line of one prediction."""
    scores = f"object score {p.object_score:+.2f}"
    if p.no_target:
        return f"no target ({scores})"
    if area_px == 0:
        return f"empty mask: no pixel above the mask threshold ({scores}, predicted IoU {p.iou_pred:.2f})"
    return f"predicted IoU {p.iou_pred:.2f} | {scores}"


def message_html(text: str) -> str:
    """A refusal or a problem, as one readable box in the page (the text escaped); "" for none."""
    if not text:
        return ""
    return (f'<div class="rsam-message" role="alert" style="padding:0.6em 0.9em;border-radius:6px;'
            f'border:1px solid #d97706;background:#fff7ed;color:#7c2d12">{html.escape(text)}</div>')


def scores_html(rows: Sequence[dict]) -> str:
    """The scores table of one request as HTML (every expression text escaped)."""
    head = ("<tr><th>#</th><th>colour</th><th>expression</th><th>predicted IoU</th><th>object score</th>"
            "<th>result</th><th>mask area (px)</th></tr>")
    body = []
    for r in rows:
        swatch = (f'<span style="display:inline-block;width:1.1em;height:1.1em;vertical-align:middle;'
                  f'border:1px solid #fff;background:{r["color"]}"></span> <code>{r["color"]}</code>')
        body.append(
            f'<tr><td>{r["index"]}</td><td class="color">{swatch}</td>'
            f'<td class="expression">{html.escape(r["expression"])}</td>'
            f'<td class="iou">{r["iou_pred"]:.3f}</td><td class="object-score">{r["object_score"]:+.3f}</td>'
            f'<td class="result">{_outcome(r["no_target"], r["area_px"])}</td>'
            f'<td class="area">{r["area_px"]}</td></tr>')
    return (f'<table id="{TABLE_ID}-table" class="rsam-scores" style="width:100%;border-collapse:collapse">'
            f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")


@dataclass
class SegmentResult:
    overlay: Any          # PIL.Image: the masks over the image with the caption panel
    rows: List[dict]      # one per expression: index, expression, color, iou_pred, object_score, no_target,
    #                       area_px, result ("found", "empty mask" or "no target")
    files: List[str]      # the mask PNGs, in expression order


class Segmenter:
    """The request handler: holds the predictor (loaded once, outside the request path), the limits and the
    folder where mask PNGs are written. Requests are serialised (the predictor holds the current image).
    """

    def __init__(self, predictor, limits: Limits = Limits(), out_dir: Optional[str] = None):
        self.predictor = predictor
        self.limits = limits
        self.out_dir = out_dir or tempfile.mkdtemp(prefix="rsam-ui-")
        if out_dir is None:
            atexit.register(shutil.rmtree, self.out_dir, True)
        os.makedirs(self.out_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._current: Optional[str] = None  # fingerprint of the image whose features the predictor holds
        self._requests: List[str] = []
        self._count = 0

    @staticmethod
    def _draw_options() -> Tuple[str, ...]:
        import inspect

        from rsam.visualization import draw_masks

        return tuple(inspect.signature(draw_masks).parameters)

    @classmethod
    def styles(cls) -> Tuple[str, ...]:
        """The overlay styles ``draw_masks`` offers ("Outline", "Fill"), or ("Fill",) for one without ``style``."""
        return STYLE_CHOICES if "style" in cls._draw_options() else ("Fill",)

    @classmethod
    def side_by_side_available(cls) -> bool:
        return "side_by_side" in cls._draw_options()

    def _set_image(self, image: Any) -> None:
        key = _fingerprint(image)
        if key is not None and key == self._current and self.predictor.image is not None:
            return
        self._current = None
        self.predictor.set_image(image)
        self._current = key

    def _request_dir(self) -> str:
        self._count += 1
        path = os.path.join(self.out_dir, f"request-{self._count:05d}")
        os.makedirs(path, exist_ok=True)
        self._requests.append(path)
        while len(self._requests) > KEEP_REQUESTS:
            shutil.rmtree(self._requests.pop(0), ignore_errors=True)
        return path

    def run(self, image: Any, text: Optional[str], style: str = "Outline", side_by_side: bool = False,
            name: str = "") -> SegmentResult:
        """One request: image (path, PIL image or array) + expressions (one per line) -> :class:`SegmentResult`.
        ``name``: the file's name as the user knows it (messages never show the server's paths). Raises
        :class:`UIError` with a message for the page."""
        from rsam.data.images import ImageInputError
        from rsam.visualization import Caption, draw_masks, mask_colors, mask_to_png

        if image is None:
            raise UIError("upload an image or pick an example first")
        path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else ""
        name = name or os.path.basename(path) or "the image"
        texts = _parse_texts(text, self.limits)
        w, h = _image_size(image, name)
        if w * h > self.limits.max_pixels:
            raise UIError(f"the image is {w} x {h} = {w * h / 1e6:.1f} megapixels: at most "
                          f"{self.limits.max_pixels / 1e6:g} megapixels")
        with self._lock:
            try:
                self.predictor.check_texts(texts)  # too many tokens etc.: before the image encoder runs
            except (ValueError, TypeError) as exc:
                raise UIError(str(exc).replace("RSAMPredictor.predict: ", "")) from None
            try:
                self._set_image(image)
            except (ImageInputError, OSError) as exc:  # a truncated file is an OSError
                raise _unreadable(name, exc, path) from None
            try:
                preds = self.predictor.predict(texts)
            except (ValueError, TypeError) as exc:
                raise UIError(str(exc).replace("RSAMPredictor.predict: ", "")) from None
            rgb = self.predictor.image
            out = self._request_dir()
            masks = [p.mask.cpu().numpy().astype(bool) for p in preds]
            colors = mask_colors(rgb, masks)  # each stands out on what its mask covers (a red ship gets no red)
            captions, rows, files = [], [], []
            for k, (p, m, color) in enumerate(zip(preds, masks, colors)):
                area = int(m.sum())
                captions.append(Caption(p.text, color, _detail(p, area)))
                rows.append({"index": k + 1, "expression": p.text, "color": _hex(color), "iou_pred": p.iou_pred,
                             "object_score": p.object_score, "no_target": bool(p.no_target), "area_px": area,
                             "result": _outcome(bool(p.no_target), area)})
                mask_path = os.path.join(out, f"mask_{k + 1:02d}_{_slug(p.text)}.png")
                mask_to_png(m).save(mask_path)
                files.append(mask_path)
            kwargs = {"side_by_side": True} if side_by_side and self.side_by_side_available() else {}
            if "Outline" in self.styles():
                kwargs["style"] = "outline" if str(style).lower() == "outline" else "fill"
            overlay = draw_masks(rgb, masks, captions, **kwargs)
        return SegmentResult(overlay, rows, files)

    def __call__(self, image: Any, text: Optional[str], style: str = "Outline", side_by_side: bool = False):
        """The page's callback -> (overlay image, scores table HTML, mask PNG paths, message HTML).

        ``image``: Gradio's file payload (a dict with ``path`` and ``orig_name``: the app passes inputs
        unprocessed, so that a file Pillow cannot open reaches :meth:`run` instead of failing inside Gradio with
        its temporary path), a path, an array or None. A refusal clears the outputs, shows its message and logs
        one line; so does a failure of the handler itself (its traceback only with ``RSAM_DEBUG=1``).
        """
        name = ""
        if isinstance(image, dict):
            name = os.path.basename(str(image.get("orig_name") or ""))
            image = image.get("path")
        try:
            result = self.run(image, text, style, side_by_side, name)
        except UIError as exc:
            LOG.warning("refused request: %s", exc)
            return None, "", None, message_html(str(exc))
        except Exception as exc:  # a bug must not take the server down or show a traceback in the page
            LOG.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=bool(os.environ.get("RSAM_DEBUG")))
            return None, "", None, message_html(f"segmentation failed ({type(exc).__name__}); the server log "
                                                "has the details")
        return result.overlay, scores_html(result.rows), result.files, ""


# ------------------------------------------------------------------------------------------------ the app


def find_examples(directory: Optional[str]) -> List[Tuple[str, str]]:
    """The example images of ``directory`` -> [(path, expressions)]; expressions from ``<stem>.txt`` or ""."""
    if not directory:
        return []
    if not os.path.isdir(directory):
        raise UsageError(f"--examples {directory}: not a directory")
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.lower().endswith(IMAGE_EXTS) and os.path.isfile(path):
            sidecar = os.path.splitext(path)[0] + ".txt"
            texts = ""
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8", errors="replace") as f:
                    texts = "\n".join(line.strip() for line in f if line.strip())
            out.append((os.path.abspath(path), texts))
        if len(out) >= MAX_EXAMPLES:
            break
    if not out:
        raise UsageError(f"--examples {directory}: no images ({', '.join(IMAGE_EXTS)})")
    return out


def _model_line(predictor) -> str:
    size = getattr(predictor.model, "image_size", "?")
    return f"network input {size} x {size} px, device {predictor.device}"


def _private_upload_dir() -> str:
    """A new folder for this server's uploads and Gradio's copies, made Gradio's ``GRADIO_TEMP_DIR`` (read when
    the page's components and the server are created) and removed when the process exits, even if
    :func:`close` is never reached. Inside a ``GRADIO_TEMP_DIR`` the user chose, if any."""
    parent = os.environ.get("GRADIO_TEMP_DIR") or None
    if parent:
        os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="rsam-ui-files-", dir=parent)
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)
    return folder


def build_app(predictor, examples: Sequence[Any] = (), limits: Limits = Limits(), title: str = "RSAM",
              out_dir: Optional[str] = None):
    """The Gradio Blocks of the demo around a loaded ``predictor``.

    ``examples``: image paths, or (path, expressions) pairs (see :func:`find_examples`). Start it with
    :func:`launch` (it applies the upload limit and the offline / local defaults), stop it with :func:`close`.
    The handler is ``app.rsam_segmenter`` (a :class:`Segmenter`); uploads and Gradio's copies go to
    ``app.rsam_upload_dir`` (mask PNGs too, unless ``out_dir`` is given).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    upload_dir = _private_upload_dir()
    segmenter = Segmenter(predictor, limits, out_dir or os.path.join(upload_dir, "masks"))
    pairs = [(str(e), "") if isinstance(e, (str, os.PathLike)) else (str(e[0]), str(e[1] or "")) for e in examples]
    styles = segmenter.styles()
    with gr.Blocks(title=f"{title} web demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {html.escape(title)}: referring remote-sensing image segmentation\n"
                    "Upload an image (or pick an example), type what to segment, one expression per line, and "
                    f"press **Segment**. Limits: {limits.describe()}. Model: {_model_line(predictor)}.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="rsam-input")
                texts = gr.Textbox(label="Expressions (one per line)", lines=3, max_lines=limits.max_expressions,
                                   placeholder="the red ship\nthe largest white building", elem_id="rsam-texts")
                with gr.Row():
                    style = gr.Radio(list(styles), value=styles[0], label="Masks", elem_id="rsam-style")
                    side = gr.Checkbox(value=False, label="Input beside the overlay", elem_id="rsam-side",
                                       visible=segmenter.side_by_side_available())
                button = gr.Button("Segment", variant="primary", elem_id="rsam-segment")
                if pairs:
                    gr.Examples(examples=[[p, t] for p, t in pairs], inputs=[image, texts], label="Examples",
                                examples_per_page=12, cache_examples=False, elem_id="rsam-examples")
            with gr.Column():
                message = gr.HTML(elem_id=MESSAGE_ID)
                overlay = gr.Image(label="Masks", type="pil", format="png", interactive=False,
                                   elem_id="rsam-overlay")
                table = gr.HTML(elem_id=TABLE_ID)
                files = gr.File(label="Mask PNGs (0 / 255, at the image's size)", file_count="multiple",
                                interactive=False, elem_id="rsam-files")
        # Inputs unprocessed: Gradio would open the upload with PIL itself and show its own error, temporary
        # path included, for a file that is not an image (Segmenter.__call__ says it in the page instead).
        button.click(segmenter, inputs=[image, texts, style, side], outputs=[overlay, table, files, message],
                     concurrency_limit=1, api_name="segment", preprocess=False)
    app.rsam_segmenter = segmenter
    app.rsam_upload_dir = upload_dir
    app.rsam_limits = limits
    app.rsam_allowed_paths = sorted({os.path.dirname(p) for p, _ in pairs})
    return app


def launch(app, host: str = "127.0.0.1", port: Optional[int] = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server of :func:`build_app`'s ``app``: upload limit, no share link unless ``share``,
    server-side rendering off (no Node process), the example folders served."""
    limits = getattr(app, "rsam_limits", Limits())
    return app.launch(server_name=host, server_port=port, share=bool(share), inbrowser=False,
                      prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True,
                      max_file_size=limits.max_file_bytes, allowed_paths=list(getattr(app, "rsam_allowed_paths", [])),
                      ssr_mode=False, mcp_server=False, pwa=False)


def close(app) -> None:
    """Stop the server of :func:`launch` and remove its files (uploads, Gradio's copies, mask PNGs)."""
    try:
        app.close()
    finally:
        folder = getattr(app, "rsam_upload_dir", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
