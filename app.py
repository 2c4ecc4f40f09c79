"""A page to search a paper collection, as a Hugging Face Space holds it (Gradio), offline on the embedded default.

    python app.py                         # search_index/, built first from the shipped SYNERGY papers if missing
    python app.py --index my_index        # any index search.py built
    python app.py --host 0.0.0.0 --port 7860

Search by text or by paper ids (papers likely co-cited with yours), the domain chosen or predicted; or compare two
abstracts. Each view is also an HTTP API (`/search`, `/like`, `/compare`: gradio_client, or the page's "Use via
API" link). Queries are answered one at a time (each uses every core).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from moebert.device import default_device  # noqa: E402
from moebert.encoders.export.manifest import ExportError  # noqa: E402
from moebert.encoders.options import EncodingOptions, serving_options  # noqa: E402
from moebert.logs import show_logs  # noqa: E402
from moebert.search.index import DEFAULT_INDEX_DIR, FAISS_FILE, IndexSettings, PaperIndex, SearchError, build_index  # noqa: E402
from moebert.search.page import build_page  # noqa: E402
from moebert.search.service import SearchService  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=str(DEFAULT_INDEX_DIR), help="an index folder (search.py index); the "
                        "default one is built from the shipped papers when it is missing")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def load_service(folder: Path) -> SearchService:
    """The service over the index in `folder`; the default index is built first when missing (on the serving
    backend, as `python search.py index` builds it)."""
    if not (folder / FAISS_FILE).exists() and folder == DEFAULT_INDEX_DIR:
        options, why = serving_options(EncodingOptions(device=default_device()))
        print(f"no index in {folder}/ yet: indexing the shipped SYNERGY papers first (backend {options.runtime}: "
              f"{why})", flush=True)
        build_index(None, folder, None, options, IndexSettings())
    return SearchService(PaperIndex.load(folder))


def main(argv=None):
    show_logs()
    args = parse_args(argv)
    try:
        service = load_service(Path(args.index))
    except (SearchError, ExportError) as error:
        raise SystemExit(f"error: {error}") from None
    page = build_page(service)
    page.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
