"""transformers integration: the `sparsepress` quantizer (from_pretrained) and export to plain folders.

Example:
    >>> from sparsepress.interop.hf.quantizer import SparsepressConfig
    >>> SparsepressConfig().to_dict()["quant_method"]
    'sparsepress'
"""
