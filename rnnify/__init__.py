"""rnnify's entry: the command line (``cli``; ``python -m convert`` is its spelling), the recipe schema
(``recipe``), the stages a recipe lists (``stages``) and the pipeline that composes the converter (``convert``),
the trainer (``distill``) and the judge (``eval``).  ``store`` (atomic files, the cache, pinned downloads) is the
one leaf the packages below share; it imports nothing of ours.  Importing ``rnnify`` itself imports nothing."""
