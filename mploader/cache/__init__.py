"""The cache of ``prepare``'s results.

    index.py   seen from the parent: the memory cache's file and index, the
               budget, the counts, a directory cache's recipe and cache_info()
    keys.py    a directory cache's key: the recipe of what prepare computes with
    stores.py  seen from a worker: where entries are read and written, and
               whose entries a directory's worker trusts

Importing this package imports none of them: a worker imports ``stores``
alone (and ``keys`` for a directory cache).
"""
