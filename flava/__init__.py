"""FLAVA model, losses, masking, image tokenizer and transformers conversion (see docs/flava-model.md).

Submodules: ``flava.config``, ``flava.model``, ``flava.losses``, ``flava.masking``, ``flava.codebook``,
``flava.convert``. Importing ``flava`` itself is cheap (transformers is imported only where needed).
"""
