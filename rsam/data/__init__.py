"""Everything between files on disk and a training batch.

* :mod:`rsam.data.risors`     -- RISORS reader/dataset (JSON + COCO RLE), negatives, samplers, loader builders
* :mod:`rsam.data.transforms` -- square resize, black boxes, normalisation (train / eval)
* :mod:`rsam.data.tokenizer`  -- BERT WordPiece wrapper with the ``official`` and ``standard`` conventions
* :mod:`rsam.data.batch`      -- ``Batch``, ``ImageSample`` and the ``Collator``
* :mod:`rsam.data.synthetic`  -- synthetic RISORS-format dataset writer (``python -m rsam.data.synthetic``)

Submodules are imported explicitly (``from rsam.data.risors import RISORSDataset``) so that importing one piece
does not pull in the others' dependencies (e.g. ``transformers`` for the tokenizer).
"""
