"""The PubMed client against a local HTTP server that answers in E-utilities' XML formats."""

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moebert.data.cocitation import BuildOptions, build_pairs, make_graph
from moebert.data.pubmed import PubMedClient, PubMedError, fetch_domain

ARTICLES = {
    "11": ("Heart failure trial", [("BACKGROUND", "Patients with reduced ejection fraction."), ("RESULTS", "Fewer deaths.")]),
    "12": ("Statins and <i>plaque</i>", [(None, "Statins stabilise plaque.")]),
    "13": ("Hypertension cohort", [(None, "Blood pressure predicts stroke.")]),
    "14": ("Editorial without abstract", []),
    "15": ("Atrial fibrillation", [(None, "Anticoagulation lowers stroke risk.")]),
    "16": ("Valve surgery", [(None, "Outcomes after valve replacement.")]),
}
CITED_BY = {"11": ["900", "901"], "12": ["900", "901"], "13": ["900"], "15": ["902"], "16": ["902"]}
REFS = {"13": ["12"]}


def article_xml(pmid):
    title, sections = ARTICLES[pmid]
    abstract = "".join(f'<AbstractText{f" Label={label!r}" if label else ""}>{text}</AbstractText>' for label, text in sections)
    return (
        f"<PubmedArticle><MedlineCitation><PMID>{pmid}</PMID><Article><ArticleTitle>{title}</ArticleTitle>"
        f"{f'<Abstract>{abstract}</Abstract>' if sections else ''}</Article></MedlineCitation></PubmedArticle>"
    )


class EUtilities(BaseHTTPRequestHandler):
    hits: list = []
    fail_next_efetch = 0

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        params = urllib.parse.parse_qs(self.rfile.read(length).decode())
        endpoint = self.path.rsplit("/", 1)[-1].removesuffix(".fcgi")
        type(self).hits.append(endpoint)
        if endpoint == "efetch" and type(self).fail_next_efetch:
            type(self).fail_next_efetch -= 1
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        body = getattr(self, endpoint)(params)
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.end_headers()
        self.wfile.write(body.encode())

    def esearch(self, params):
        ids = sorted(ARTICLES)
        if params.get("retmax") == ["0"]:
            return f"<eSearchResult><Count>{len(ids)}</Count><QueryKey>1</QueryKey><WebEnv>ENV</WebEnv></eSearchResult>"
        start, size = int(params["retstart"][0]), int(params["retmax"][0])
        return "<eSearchResult><IdList>" + "".join(f"<Id>{i}</Id>" for i in ids[start : start + size]) + "</IdList></eSearchResult>"

    def efetch(self, params):
        ids = params["id"][0].split(",")
        if "16" in ids:
            return "<PubmedArticleSet><PubmedArticle><MedlineCitation>"  # malformed: cut off
        records = "".join(article_xml(i) for i in ids)
        if "15" in ids:
            records += "<PubmedArticle><MedlineCitation><Article/></MedlineCitation></PubmedArticle>"  # no PMID
        return f"<PubmedArticleSet>{records}</PubmedArticleSet>"

    def elink(self, params):
        sets = []
        for pmid in params["id"]:
            dbs = "".join(
                f"<LinkSetDb><LinkName>{name}</LinkName>" + "".join(f"<Link><Id>{i}</Id></Link>" for i in table.get(pmid, [])) + "</LinkSetDb>"
                for name, table in (("pubmed_pubmed_citedin", CITED_BY), ("pubmed_pubmed_refs", REFS))
            )
            sets.append(f"<LinkSet><IdList><Id>{pmid}</Id></IdList>{dbs}</LinkSet>")
        return f"<eLinkResult>{''.join(sets)}</eLinkResult>"

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    EUtilities.hits = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EUtilities)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/eutils/"
    httpd.shutdown()


def client(url, cache_dir):
    return PubMedClient(cache_dir, api_key="test", base_url=url, backoff_s=0.01, efetch_batch_size=2)


def test_fetch_domain_retries_skips_bad_records_resumes_from_cache(server, tmp_path, caplog):
    EUtilities.fail_next_efetch = 1
    pubmed = client(server, tmp_path)
    papers, citations = fetch_domain(pubmed, "CVD", "cardiology[MeSH]")
    assert EUtilities.hits.count("efetch") == 4  # 3 batches of 2 ids, the first answered 429 once
    texts = dict(zip(papers["id"], papers["text"]))
    # 14 has no abstract, 15 and 16 share the malformed batch; the rest of the build goes on
    assert sorted(texts) == ["11", "12", "13"]
    assert texts["11"] == "Heart failure trial BACKGROUND: Patients with reduced ejection fraction. RESULTS: Fewer deaths."
    assert texts["12"] == "Statins and plaque Statins stabilise plaque."
    assert "malformed efetch XML" in caplog.text
    assert set(map(tuple, citations.to_numpy())) == {
        ("900", "11"), ("901", "11"), ("900", "12"), ("901", "12"), ("900", "13"), ("13", "12")
    }
    tables, summary = build_pairs(make_graph(papers, citations), BuildOptions(split_fractions=(1.0, 0.0, 0.0)))
    positives = tables["CVD"]["train"].to_pandas()
    assert sorted(zip(positives.paper_a, positives.paper_b, positives.cocitation_count)) == [
        ("11", "12", 2), ("11", "13", 1), ("12", "13", 1)
    ]

    # an interrupted or repeated build finds every response in the cache: no request reaches the server
    sent = len(EUtilities.hits)
    again = client(server, tmp_path)
    papers_again, citations_again = fetch_domain(again, "CVD", "cardiology[MeSH]")
    assert len(EUtilities.hits) == sent and again.requests_sent == 0
    assert papers_again.equals(papers) and citations_again.equals(citations)


def test_persistent_server_errors_end_with_a_clear_message(server, tmp_path):
    EUtilities.fail_next_efetch = 10
    pubmed = PubMedClient(tmp_path, api_key="test", base_url=server, backoff_s=0.01, max_retries=2)
    with pytest.raises(PubMedError, match="answered HTTP 429 after 3 tries"):
        pubmed.fetch_abstracts(["11"])
    EUtilities.fail_next_efetch = 0
