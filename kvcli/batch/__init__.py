"""Corpus mode: many documents through one set of settings (``kvcli batch``).

Sits beside ``eval`` and ``profile``, on top of the API; nothing below imports it.  One job
per module:

* ``discover``: the documents a run covers (files, folders, globs; deduplicated, stable order);
* ``spec``: what a run does to each document (``BatchSpec``), its settings key, the
  ``--questions`` file and ``--kv-memory`` sizes (no torch: the CLI checks them first);
* ``results``: the JSONL file, its single writer and what a rerun reads back from it;
* ``work``: one document in a worker that holds the model (``Worker``);
* ``runners``: where workers run: in this process, in local worker processes, on Ray;
* ``run``: the run itself: plan (skip what is done), dispatch, write, summarize.
"""
