"""The one function that turns a model name into an encoder (`load_encoder`: eval.py, search.py, the benchmarks), and
the encoder of a MoE-BERT made in memory (`encoder_of_model`: search's embedded model), each on the backend and
at the length the options ask for (by default the length the model was trained at)."""

from transformers import PretrainedConfig

from configuration_moebert import MoEBertConfig
from moebert.encoders.baselines import SentenceTransformerEncoder, TfidfEncoder
from moebert.encoders.export.cache import cached_export_encoder, load_export_encoder
from moebert.encoders.export.manifest import is_export
from moebert.encoders.interface import Encoder
from moebert.encoders.options import EXPORTED, EncodingOptions
from moebert.encoders.specialists import SpecialistsEncoder, specialist_folders
from moebert.encoders.transformer import TransformerEncoder
from moebert.loading import is_moebert, load_transformer, max_seq_length_of
from moebert.names import local_copy


def load_encoder(spec: str, options: EncodingOptions, trust_remote_code: bool = False) -> Encoder:
    """`tfidf`; a folder of specialists (one MoE-BERT per domain); an export of a MoE-BERT, or with an exported backend a MoE-BERT itself; a MoE-BERT; a
    sentence-transformers model (has modules.json); else any encoder, mean-pooled. A base shipped as a PyPI package
    (moebert.names.OFFLINE_COPIES) loads by its Hub id from its local folder."""
    from transformers.utils import cached_file

    spec = local_copy(spec)
    if spec == "tfidf":
        return TfidfEncoder()
    specialists = specialist_folders(spec)
    if specialists:  # a folder of one specialist per domain: each loaded as itself when its domain comes
        return SpecialistsEncoder(specialists, lambda folder: load_encoder(folder, options, trust_remote_code))
    if is_export(spec) or (options.runtime in EXPORTED and is_moebert(spec)):
        runtime = options.runtime if options.runtime in EXPORTED else "onnx"
        length = options.max_seq_length or max_seq_length_of(spec, MoEBertConfig.from_pretrained(spec))
        return load_export_encoder(spec, length, options.batch_size_for(runtime), runtime)
    if not is_moebert(spec) and cached_file(spec, "modules.json", _raise_exceptions_for_missing_entries=False):
        length = options.max_seq_length or max_seq_length_of(spec, PretrainedConfig.from_pretrained(spec))
        return SentenceTransformerEncoder(spec, length, options.batch_size_for("torch"), options.device,
                                          trust_remote_code)
    model, tokenizer = load_transformer(spec, trust_remote_code)
    length = options.max_seq_length or max_seq_length_of(spec, model.config)
    return TransformerEncoder(model.to(options.device).eval(), tokenizer, length, options.batch_size_for("torch"))


def encoder_of_model(load_model, fingerprint: str, options: EncodingOptions, source: str) -> Encoder:
    """The encoder of a MoE-BERT made in memory by `load_model() -> (model, tokenizer)` (search's embedded model), on
    the options' backend. On an exported backend the model is made only when the cache has no export of it (keyed by
    `fingerprint`): a cached export needs no torch model in memory."""
    if options.runtime in EXPORTED:
        return cached_export_encoder(fingerprint, load_model, options.max_seq_length,
                                     options.batch_size_for(options.runtime), options.runtime, source=source)
    model, tokenizer = load_model()
    length = options.max_seq_length or model.config.sequence_length()
    return TransformerEncoder(model.to(options.device).eval(), tokenizer, length, options.batch_size_for("torch"))
