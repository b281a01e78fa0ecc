"""Commands that build training data: document sources, tokenizers and packed webdataset shards.

``cpmtp data tokenizer`` trains a tokenizer on any inputs (:mod:`data_pipelines.tokenizer`); ``cpmtp data
shards`` tokenises the inputs and writes fixed-length samples into webdataset tar shards with a manifest
(:mod:`data_pipelines.shards`, format ``cpmtp_dist.shards/v1``). Both read documents through
:mod:`data_pipelines.sources`. See ``data_pipelines/README.md``.
"""
