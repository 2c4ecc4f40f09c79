"""Exports of a MoE-BERT for fast CPU encoding: each domain's expert as a plain graph (`graph`), the export folder's
manifest (`manifest`), the encoder that reads such a folder (`encoder`), one module per runtime (`onnx_runtime`,
`openvino_runtime`), writing and opening an export (`runtimes`) and the cache of exports made on first use
(`cache`)."""
