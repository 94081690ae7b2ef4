"""compressed-tensors (llm-compressor's folder layout) in and out.

`read`: a compressed-tensors folder onto our packed formats (`sp.load` and every CLI command use it for
such folders); `write`: `sparsepress export DIR --to compressed-tensors`; `scheme`: its config, validated.

Example:
    >>> from sparsepress.interop.compressed_tensors.scheme import SPARSE_FORMATS
    >>> SPARSE_FORMATS
    ('dense', 'sparse-bitmask', 'sparse-24-bitmask')
"""
