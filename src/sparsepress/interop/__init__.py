"""Interoperability: outside formats in and out (one module per format), transformers registration.

- `compressed_tensors`: llm-compressor / compressed-tensors folders, read onto our packed formats and written back.
- `hf`: `AutoModel*.from_pretrained` on our folders (a transformers quantizer), and export to plain folders.
- `onnx`: a dense-equivalent ONNX graph that ONNX Runtime runs.
- `sentence_transformers`: a `SentenceTransformer` on the packed model.
- `generate`: streamed decoding with a tokens/s report (`sparsepress generate`).

Example:
    >>> from sparsepress.interop.hf.quantizer import QUANT_METHOD
    >>> QUANT_METHOD
    'sparsepress'
"""
