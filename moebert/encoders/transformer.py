"""Encoders on torch: a MoE-BERT or any Hugging Face encoder (`TransformerEncoder`), a MoE-BERT over stored stem
states (`StemEncoder`, training's validation while the stem is frozen), and every process encoding its share
(`ShardedEncoder`).
"""

import numpy as np
import torch
from accelerate.utils import gather_object

from moebert.encoders.interface import Encoder, encode_in_batches


class TransformerEncoder(Encoder):
    """A MoE-BERT (texts get their domain token and go through its expert) or a plain encoder (mean pooling over
    non-padding tokens), on torch."""

    def __init__(self, model, tokenizer, max_seq_length: int, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.routes_by_domain = getattr(model.config, "model_type", None) == "moebert"
        self.config = model.config if self.routes_by_domain else None
        self.max_seq_length, self.batch_size = max_seq_length, batch_size

    @property
    def device(self) -> str:
        return str(self.model.device)

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        if self.routes_by_domain:
            texts = self.model.prepend_domain_token(texts, domain)  # unknown domain: ValueError naming the known

        def run(batch_texts):
            batch = self.tokenizer(
                batch_texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            ).to(self.model.device)
            if self.routes_by_domain:  # by name, in either routing mode (token routing would read the zero segments)
                batch["domain_ids"] = torch.full(
                    (len(batch_texts),), self.model.config.domain_index(domain), device=self.model.device
                )
            with torch.inference_mode():
                output = self.model(**batch)
            return self._pool(output, batch["attention_mask"]).float().cpu().numpy()

        return encode_in_batches(texts, self.batch_size, self.model.config.hidden_size, f"encoding {domain}", run)

    def _pool(self, output, attention_mask):
        if self.routes_by_domain:
            return output.pooler_output
        mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class StemEncoder(Encoder):
    """A MoE-BERT over stored stem states (moebert.training.stem_states): each text is encoded from the first MoE layer's
    experts up, which is what the model computes from the text (it must be among the stored inputs). Training scores
    `valid` with it while the stem is frozen."""

    routes_by_domain = True

    def __init__(self, model, stems, batch_size: int):
        self.model, self.stems, self.batch_size, self.config = model, stems, batch_size, model.config

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        domain_id = self.model.config.domain_index(domain)

        def run(batch_texts):
            batch = self.stems.batch([(domain_id, t) for t in batch_texts])
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            domain_ids = torch.full((len(batch_texts),), domain_id, device=self.model.device)
            with torch.inference_mode():
                return self.model(**batch, domain_ids=domain_ids).pooler_output.float().cpu().numpy()

        lengths = [self.stems.length((domain_id, t)) for t in texts]  # stored token counts
        return encode_in_batches(texts, self.batch_size, self.model.config.hidden_size, f"encoding {domain}", run, lengths)


class ShardedEncoder(Encoder):
    """Every process encodes its share of the texts (every num_processes-th one) and all of them get every vector:
    validation keeps all processes working in step, rather than leaving the others in a barrier that a long
    validation would run into its timeout."""

    def __init__(self, encoder: Encoder, accelerator):
        self.encoder, self.accelerator = encoder, accelerator
        self.routes_by_domain, self.config = encoder.routes_by_domain, encoder.config

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shares = gather_object([self.encoder.encode(texts[rank::world], domain)])
        vectors = np.zeros((len(texts), shares[0].shape[1]), dtype=np.float32)
        for process, share in enumerate(shares):
            vectors[process::world] = share
        return vectors
