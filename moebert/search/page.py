"""The search page (Gradio) over a SearchService: what app.py serves, as a Hugging Face Space would.

Two views: search (by text or by paper ids; the domain chosen or predicted, with its probability; results with
title, snippet, domain, score and P(co-cited)) and compare (two abstracts: their cosine and calibrated probability in
a chosen domain). Each button is also an HTTP API endpoint (`/search`, `/like`, `/compare`), which gradio_client or
any HTTP client can call. A bad input shows its one-line message (gr.Error) and the page keeps serving.
"""

import functools

from moebert.search.index import SearchError
from moebert.search.service import PREDICT, QueryError, SearchService

COLUMNS = ["rank", "title", "snippet", "domain", "score", "P(co-cited)", "id", "closest given paper"]


def result_table(hits: list[dict]) -> list[list]:
    """Rows of the results table: P(co-cited) blank where the model has no calibration for the pair, the closest
    given paper only for papers like given ones."""
    return [[hit["rank"], hit["title"], hit["snippet"], hit["domain"], f"{hit['score']:.4f}",
             "" if hit["probability"] is None else f"{hit['probability']:.2f}", hit["id"], hit.get("closest", "")]
            for hit in hits]


def domain_line(result: dict) -> str:
    if result["domain_probability"] is None:
        return f"Domain **{result['domain']}** (chosen)."
    return f"Domain **{result['domain']}** (predicted, p = {result['domain_probability']:.2f})."


def build_page(service: SearchService, title: str = "MoE-BERT search"):
    import gradio as gr

    def answered(function):
        """Input errors as a message on the page (and in the API's error), never a stack trace; the signature kept,
        so the API's parameters have the function's names."""
        @functools.wraps(function)
        def run(*args):
            try:
                return function(*args)
            except (QueryError, SearchError) as error:
                raise gr.Error(str(error), print_exception=False) from None
        return run

    def search(text, domain, top_k):
        result = service.search(text, domain, top_k)
        return domain_line(result), result_table(result["hits"])

    def like(ids, top_k):
        result = service.like(ids, top_k)
        return f"Papers likely co-cited with {', '.join(result['ids'])}.", result_table(result["hits"])

    def compare(abstract_a, abstract_b, domain):
        result = service.compare(abstract_a, abstract_b, domain)
        probability = ("no calibration in this model (train one: python train.py)" if result["probability"] is None
                       else f"{result['probability']:.3f}")
        how = "chosen" if result["domain_probability"] is None else f"predicted, p = {result['domain_probability']:.2f}"
        return (f"Domain **{result['domain']}** ({how}): cosine **{result['cosine']:.4f}**, "
                f"P(co-cited) **{probability}**.")

    domains = [PREDICT, *service.domains]
    note = "" if service.calibrated else (" The model has no calibration, so P(co-cited) stays blank: "
                                          "`python train.py` trains and calibrates one.")
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\n{service.papers:,} papers in {len(service.domains)} domains; each paper and query is "
                    f"embedded by its own domain's expert.{note}")
        with gr.Tab("Search"):
            with gr.Row():
                text = gr.Textbox(label="Query: a title, an abstract or a few words", lines=3, scale=3)
                with gr.Column(scale=1):
                    # typed or API values reach the service's own check (Gradio's would log a traceback)
                    domain = gr.Dropdown(domains, value=PREDICT, label="Domain", allow_custom_value=True)
                    top_k = gr.Slider(1, 50, value=10, step=1, label="Results")
            search_button = gr.Button("Search", variant="primary")
            with gr.Row():
                ids = gr.Textbox(label="Or papers like these: paper ids, separated by commas", scale=3)
                like_button = gr.Button("Papers like these", scale=1)
            found = gr.Markdown()
            table = gr.Dataframe(headers=COLUMNS, wrap=True, interactive=False,
                                 column_widths=["4%", "24%", "34%", "10%", "6%", "7%", "8%", "7%"])
        with gr.Tab("Compare two abstracts"):
            with gr.Row():
                first = gr.Textbox(label="First abstract", lines=8)
                second = gr.Textbox(label="Second abstract", lines=8)
            compare_domain = gr.Dropdown(domains, value=PREDICT, label="Domain", allow_custom_value=True)
            compare_button = gr.Button("Compare", variant="primary")
            verdict = gr.Markdown()
        search_button.click(answered(search), [text, domain, top_k], [found, table], api_name="search")
        text.submit(answered(search), [text, domain, top_k], [found, table], api_name=False)
        like_button.click(answered(like), [ids, top_k], [found, table], api_name="like")
        compare_button.click(answered(compare), [first, second, compare_domain], [verdict], api_name="compare")
    return page
