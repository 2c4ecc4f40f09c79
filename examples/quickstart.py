"""Upcycle the embedded base model (all-MiniLM-L6-v2) into a 5-domain MoE-BERT, embed two abstracts in one domain
and print their cosine similarity; then save the model so that AutoModel can load it.

    python -m examples.quickstart [--base PATH_OR_HUB_ID] [--output_dir quickstart-moebert]
"""

import argparse

import torch

from modeling_moebert import MoEBertModel
from moebert.names import default_base_model

ABSTRACTS = [
    "Left ventricular hypertrophy is an independent predictor of cardiovascular events in hypertensive patients.",
    "Regression of left ventricular mass under antihypertensive treatment lowers the risk of stroke and heart failure.",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="BERT checkpoint to upcycle (default: the embedded MiniLM)")
    parser.add_argument("--output_dir", default="quickstart-moebert")
    args = parser.parse_args()
    model, tokenizer = MoEBertModel.from_bert(args.base or default_base_model(), domains=["CVD", "COPD", "SKIN", "PARA", "AUTO"])
    model.eval()
    texts = model.prepend_domain_token(ABSTRACTS, "CVD")  # "[CVD] Left ventricular ..." routes to the CVD expert
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        embeddings = model(**batch).pooler_output
    similarity = torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0)
    print(f"domains: {model.config.domains}; experts in layers {model.config.moe_layers}")
    print(f"embedding shape: {tuple(embeddings.shape)}")
    print(f"cosine similarity of the two CVD abstracts: {similarity.item():.4f}")

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}/: load it with AutoModel.from_pretrained('{args.output_dir}', trust_remote_code=True)")


if __name__ == "__main__":
    main()
