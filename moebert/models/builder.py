"""The one way this project makes the MoE-BERT it works on: a BERT upcycled into the given domains, or a saved
MoE-BERT loaded with this project's classes (and grown by the domains it lacks). train.py, `python -m moebert
compose` and search's embedded model all start here, so every model is named and sized alike: its base by its Hub
id (moebert.names.public_base_name), its length from the base's own settings (moebert.loading.max_seq_length_of)."""

from modeling_moebert import MoEBertModel
from moebert.loading import is_moebert, load_moebert, max_seq_length_of
from moebert.names import local_copy, public_base_name


def build_model(name_or_path: str, domains: list[str], moe_layers="all", num_experts: int | None = None,
                add_missing_domains: bool = True):
    """(model, tokenizer). A MoE-BERT (folder or Hub id) is loaded, and each domain of `domains` it lacks is added
    with its base's feed-forward blocks (unless `add_missing_domains` is False). Any other checkpoint is upcycled:
    one expert per domain (`num_experts=1`: one shared expert) in `moe_layers`."""
    path = local_copy(name_or_path)  # the embedded base's Hub id loads from its folder, offline
    if is_moebert(path):
        model, tokenizer = load_moebert(path)
        missing = [d for d in domains if d not in model.config.domains] if add_missing_domains else []
        if missing and model.config.base_model_name_or_path is None:
            raise ValueError(f"it names no base model to copy the experts of the new domains {missing} from (it was "
                             "upcycled from a local folder, which saved files do not name): write the base's Hub id or "
                             "folder into its config.json as base_model_name_or_path")
        for domain in missing:
            model.add_domain(domain, tokenizer, init_from=local_copy(model.config.base_model_name_or_path))
        return model, tokenizer
    model, tokenizer = MoEBertModel.from_bert(path, domains=domains, moe_layers=moe_layers, num_experts=num_experts)
    # in memory a Hub id where there is one (it loads offline from the cache or the embedded folder), else the folder
    # itself, from which add_domain copies; saved files name the folder by nothing (configuration_moebert)
    model.config.base_model_name_or_path = public_base_name(path) or path
    model.config.max_seq_length = max_seq_length_of(path, model.config)  # the base's sentence-transformers settings
    return model, tokenizer
