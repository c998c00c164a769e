"""Readers that map public checkpoints onto adalink_jax parameter trees.

Every reader has the same shape: it opens the file(s) lazily, maps the stored tensors to
named array sources (``{our '/'-joined parameter path: ArraySource}``; a source has a
``shape``, a ``dtype`` and ``read(index)`` that reads only that slice, and layout changes
-- transposes, layer slices / stacks, head splits -- are sources too), and hands them to
:func:`streaming.place`, the one placement routine: it checks names and shapes once (one
:class:`common.CheckpointMismatchError` listing every missing, unexpected and mis-shaped
name), then streams each array into its sharding with ``jax.make_array_from_callback``
(each device's shard read and cast on its own), or to numpy with ``shardings=ON_HOST``.

Formats, by module:
  t5x         T5 from T5X checkpoints: legacy msgpack + TensorStore (zarr) and Orbax
              (per-leaf zarr / zarr3, or OCDBT); scanned or unscanned, either way round.
  hf          T5 / T5 1.1 / FLAN-T5 / mT5 ``save_pretrained`` directories (safetensors,
              single file or sharded index; no torch, no pickle).
  hf_vision   SigLIP (``SiglipVisionModel``, ``SiglipModel``'s vision tower) and plain ViT
              (``ViTModel``, ``ViTForImageClassification``) image towers, HF safetensors.
  big_vision  ViT / SigLIP / PaliGemma image towers from big_vision ``.npz`` (``file.npz:img``
              for a sub-tree; uncompressed members memory-mapped).
  hf_gemma    Gemma / Gemma 2 / Gemma 3 text decoders (HF safetensors, also the text part of
              Gemma 3 multimodal and PaliGemma directories).
  gguf        llama.cpp GGUF files (Gemma 3 only; F32 / F16 / BF16 / Q8_0 / K-quants ...)
              as HF-named fp32 sources, plus the config and the SentencePiece tokenizer;
  gemma_gguf  ... loaded into our Gemma through hf_gemma's mapping.
  paligemma   PaliGemma 1 / 2: HF ``PaliGemmaForConditionalGeneration`` directories and
              big_vision PaliGemma ``.npz``.
  backbone    ``config.init`` (which of the above fills which tower) and our own native
              format (``save_native``: params.safetensors + backbone.json).
Shared: ``streaming`` (sources, :func:`~streaming.place`), ``common`` (the one
flatten / unflatten helper, mismatch errors, safe paths), ``fingerprint`` (backbone hashes).
"""
