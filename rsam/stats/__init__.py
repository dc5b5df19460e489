"""Statistics of evaluation results, without torch (``rsam-compare`` starts in a second): the
``per_expression.jsonl`` format (:mod:`.records`), paired bootstrap intervals and permutation tests
(:mod:`.paired`), and seed-sweep tables (:mod:`.seed_table`)."""
