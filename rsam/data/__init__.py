"""Everything between files on disk and a training batch.

* :mod:`rsam.data.readers`    -- one reader per on-disk format (risors, rrsisd, refsegrs, risbench, jsonl):
  files -> per-image :class:`~rsam.data.readers.base.Annotation` records
* :mod:`rsam.data.safe_pickle` -- plain-data unpickler (refuses code) and JSON cache, for pickled releases
* :mod:`rsam.data.rle`        -- COCO run-length encoding and decoding
* :mod:`rsam.data.errors`     -- :class:`~rsam.data.errors.DataError` (names the file and the field)
* :mod:`rsam.data.dataset`    -- ``ReferringDataset``: expression selection, no-target expressions, bad samples
* :mod:`rsam.data.mixed`      -- ``MixedDataset``: several datasets in one training run, with sampling weights
* :mod:`rsam.data.leakage`    -- training images that also appear (by content) in an evaluation split
* :mod:`rsam.data.samplers`   -- distributed, resumable samplers
* :mod:`rsam.data.loaders`    -- train / eval data-loader builders
* :mod:`rsam.data.transforms` -- square resize, black boxes (uint8 in, uint8 out; the model normalises)
* :mod:`rsam.data.tokenizer`  -- BERT WordPiece wrapper with the ``official`` and ``standard`` conventions
* :mod:`rsam.data.batch`      -- ``Batch``, ``ImageSample`` and the ``Collator``
* :mod:`rsam.data.images`     -- ``load_image`` for the predictor and tools
* :mod:`rsam.data.synthetic`  -- synthetic datasets in every format (``python -m rsam.data.synthetic --format``)

Submodules are imported explicitly (``from rsam.data.dataset import ReferringDataset``) so that importing one
piece does not pull in the others' dependencies (e.g. ``transformers`` for the tokenizer).
"""
