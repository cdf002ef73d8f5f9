"""The GGUF format: reader, tensor names, tokenizer from metadata, block codecs + K-quants, mmproj, writer, export.

Load path: `reader`, `names`, `tokenizer`, `blocks`/`quants` (decode), `mmproj`; offline: `writer` (HF -> GGUF),
`export` (GGUF -> HF), `kquants` encoders. No architecture lives here (see autoglm.models.registry).
"""
