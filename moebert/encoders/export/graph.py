"""The graph each domain's expert becomes. A MoE-BERT sends a whole text through one domain's expert, so for one
domain it is a plain BERT (`MoEBertModel.extract_expert`). Its graph is that BERT with the model's pooling on top: the
token ids of texts that start with the domain token and their attention mask in, the pooled embedding out (the
MoE-BERT's `pooler_output` for that domain)."""

from pathlib import Path

import torch


class PooledExpert(torch.nn.Module):
    """One domain's expert (a plain BertModel) with the MoE-BERT's pooling on top: the module that is exported."""

    def __init__(self, expert, pool):
        super().__init__()
        self.expert, self.pool = expert, pool

    def forward(self, input_ids, attention_mask):
        hidden = self.expert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)


def write_plain_graph(model, tokenizer, domain: str, path: Path):
    """torch.onnx's graph of one domain's expert and the pooling, unfused, fp32, any batch size and length."""
    expert = model.extract_expert(domain).float().cpu()
    expert.set_attn_implementation("eager")  # plain ops: the pattern ONNX Runtime fuses and OpenVINO reads
    graph = PooledExpert(expert, model.pool).eval()
    sample = tokenizer(model.prepend_domain_token(["a short text", "a longer text of a few more words"], domain),
                       padding=True, return_tensors="pt")
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            graph, (sample["input_ids"], sample["attention_mask"]), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "sentence_embedding": {0: "batch"}},
        )
