"""Everything between files on disk and a training batch.

* :mod:`rsam.data.risors`     -- RISORS reader: files -> per-expression :class:`~rsam.data.risors.Annotation` records
* :mod:`rsam.data.rle`        -- COCO run-length encoding and decoding
* :mod:`rsam.data.errors`     -- :class:`~rsam.data.errors.DataError` (names the file and the field)
* :mod:`rsam.data.dataset`    -- ``RISORSDataset``: expression selection, no-target expressions, bad samples
* :mod:`rsam.data.samplers`   -- distributed, resumable samplers
* :mod:`rsam.data.loaders`    -- train / eval data-loader builders
* :mod:`rsam.data.transforms` -- square resize, black boxes (uint8 in, uint8 out; the model normalises)
* :mod:`rsam.data.tokenizer`  -- BERT WordPiece wrapper with the ``official`` and ``standard`` conventions
* :mod:`rsam.data.batch`      -- ``Batch``, ``ImageSample`` and the ``Collator``
* :mod:`rsam.data.images`     -- ``load_image`` for the predictor and tools
* :mod:`rsam.data.synthetic`  -- synthetic RISORS-format dataset writer (``python -m rsam.data.synthetic``)

Submodules are imported explicitly (``from rsam.data.dataset import RISORSDataset``) so that importing one piece
does not pull in the others' dependencies (e.g. ``transformers`` for the tokenizer).
"""
