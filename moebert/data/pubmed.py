"""Fetch a domain's papers and citation links from PubMed E-utilities, for `data/build.py pubmed`.

esearch (with history) finds the PMIDs of a query, efetch gets their titles and abstracts (structured abstracts
are joined section by section; records without an abstract are skipped), and elink gets, for every paper, the
papers citing it (`pubmed_pubmed_citedin`, from anywhere in PubMed: a co-citing paper need not be in the set)
and its references (`pubmed_pubmed_refs`). Requests keep to NCBI's rate limit (3/s, 10/s with an API key), are
retried with exponential backoff on 429 and 5xx, and every response is cached on disk, so an interrupted build
resumes without fetching anything twice.
"""

import hashlib
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
RETRY_STATUSES = {429, 500, 502, 503, 504}


class PubMedError(RuntimeError):
    pass


class PubMedClient:
    def __init__(
        self,
        cache_dir,
        api_key=None,
        base_url=DEFAULT_BASE_URL,
        email=None,
        max_retries=5,
        backoff_s=1.0,
        timeout_s=60,
        efetch_batch_size=200,
        elink_batch_size=100,
    ):
        self.cache_dir = Path(cache_dir)
        self.api_key, self.email = api_key, email
        self.base_url = base_url.rstrip("/") + "/"
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.efetch_batch_size, self.elink_batch_size = efetch_batch_size, elink_batch_size
        self.min_interval_s = 1 / 10 if api_key else 1 / 3
        self._last_request = 0.0
        self.requests_sent = 0

    def get(self, endpoint: str, params: dict, cache_params: dict | None = None) -> bytes:
        """The response body of `<base_url><endpoint>.fcgi?params`, from the cache when there.

        `cache_params` (default: `params`) names the request in the cache; history tokens that change from run
        to run (WebEnv) are left out of it so that a resumed build finds what it fetched before."""
        cache_file = self._cache_file(endpoint, cache_params if cache_params is not None else params)
        if cache_file.exists():
            return cache_file.read_bytes()
        query = dict(params) | {"tool": "moebert"}
        if self.api_key:
            query["api_key"] = self.api_key
        if self.email:
            query["email"] = self.email
        body = self._fetch(f"{self.base_url}{endpoint}.fcgi", urllib.parse.urlencode(query, doseq=True).encode())
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".part")
        partial.write_bytes(body)
        partial.replace(cache_file)  # atomic: an interrupted write never leaves a half response in the cache
        return body

    def _cache_file(self, endpoint: str, params: dict) -> Path:
        key = urllib.parse.urlencode(sorted((k, str(v)) for k, v in params.items()))
        return self.cache_dir / endpoint / f"{hashlib.sha256(key.encode()).hexdigest()}.xml"

    def _fetch(self, url: str, data: bytes) -> bytes:
        for attempt in range(self.max_retries + 1):
            wait = self.min_interval_s - (time.monotonic() - self._last_request)
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()
            self.requests_sent += 1
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=self.timeout_s) as reply:
                    return reply.read()
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUSES or attempt == self.max_retries:
                    raise PubMedError(f"{url} answered HTTP {error.code} after {attempt + 1} tries.") from None
                retry_after = error.headers.get("Retry-After")
                delay = float(retry_after) if retry_after and retry_after.isdigit() else self.backoff_s * 2**attempt
            except urllib.error.URLError as error:
                if attempt == self.max_retries:
                    raise PubMedError(f"{url} could not be reached: {error.reason}.") from None
                delay = self.backoff_s * 2**attempt
            logger.warning("retrying %s in %.1f s (try %d of %d)", url, delay, attempt + 2, self.max_retries + 1)
            time.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------- E-utilities

    def search(self, term: str, max_papers: int | None = None, page_size: int = 5000) -> list[str]:
        """PMIDs matching `term`, paged through the esearch history server."""
        first = _parse(self.get("esearch", {"db": "pubmed", "term": term, "usehistory": "y", "retmax": 0}), "esearch")
        count = int(first.findtext("Count", "0"))
        web_env, query_key = first.findtext("WebEnv"), first.findtext("QueryKey")
        total = min(count, max_papers) if max_papers else count
        ids = []
        for start in tqdm(range(0, total, page_size), desc="esearch", unit="page", disable=total <= page_size):
            page = {"db": "pubmed", "retstart": start, "retmax": min(page_size, total - start)}
            reply = self.get(
                "esearch",
                page | {"WebEnv": web_env, "query_key": query_key, "usehistory": "y"},
                cache_params=page | {"term": term},
            )
            ids += [e.text for e in _parse(reply, "esearch").iter("Id")]
        return ids[:total]

    def fetch_abstracts(self, pmids: list[str]) -> tuple[pd.DataFrame, dict]:
        """Title + abstract of each PMID; malformed responses and records are skipped and counted."""
        rows, stats = [], {"without_abstract": 0, "malformed_records": 0, "malformed_batches": 0}
        for batch in tqdm(_batches(pmids, self.efetch_batch_size), desc="efetch", unit="batch"):
            reply = self.get("efetch", {"db": "pubmed", "id": ",".join(batch), "retmode": "xml"})
            try:
                root = _parse(reply, "efetch")
            except PubMedError as error:
                logger.warning("%s; skipping PMIDs %s..%s", error, batch[0], batch[-1])
                stats["malformed_batches"] += 1
                continue
            for article in root.iter("PubmedArticle"):
                row = parse_article(article)
                if row is None:
                    stats["malformed_records"] += 1
                elif not row["abstract"]:
                    stats["without_abstract"] += 1
                else:
                    rows.append({"id": row["pmid"], "text": f"{row['title']} {row['abstract']}".strip()})
        return pd.DataFrame(rows, columns=["id", "text"]), stats

    def fetch_links(self, pmids: list[str]) -> pd.DataFrame:
        """Citation links (citing, cited) touching the PMIDs: who cites each, and what each cites."""
        links = []
        for batch in tqdm(_batches(pmids, self.elink_batch_size), desc="elink", unit="batch"):
            params = {
                "dbfrom": "pubmed",
                "db": "pubmed",
                "linkname": "pubmed_pubmed_citedin,pubmed_pubmed_refs",
                "id": batch,  # repeated id= parameters: one LinkSet per paper
            }
            try:
                root = _parse(self.get("elink", params), "elink")
            except PubMedError as error:
                logger.warning("%s; no links for PMIDs %s..%s", error, batch[0], batch[-1])
                continue
            for link_set in root.iter("LinkSet"):
                source = link_set.findtext("IdList/Id")
                for db in link_set.iter("LinkSetDb"):
                    name = db.findtext("LinkName")
                    for other in (e.text for e in db.iter("Id")):
                        if name == "pubmed_pubmed_citedin":
                            links.append((other, source))
                        elif name == "pubmed_pubmed_refs":
                            links.append((source, other))
        return pd.DataFrame(links, columns=["citing", "cited"]).drop_duplicates()


def parse_article(article: ET.Element) -> dict | None:
    """PMID, title and abstract of one PubmedArticle; structured sections read `LABEL: text`. None if no PMID."""
    pmid = article.findtext("MedlineCitation/PMID")
    if not pmid:
        return None
    title = "".join(article.find("MedlineCitation/Article/ArticleTitle").itertext()) if article.find(
        "MedlineCitation/Article/ArticleTitle"
    ) is not None else ""
    sections = []
    for part in article.iterfind("MedlineCitation/Article/Abstract/AbstractText"):
        text = " ".join("".join(part.itertext()).split())
        label = part.get("Label")
        if text:
            sections.append(f"{label}: {text}" if label else text)
    return {"pmid": pmid.strip(), "title": " ".join(title.split()), "abstract": " ".join(sections)}


def fetch_domain(client: PubMedClient, domain: str, query: str, max_papers: int | None = None):
    """Papers (id, text, domain) and citations (citing, cited) for one domain's query."""
    pmids = client.search(query, max_papers)
    papers, stats = client.fetch_abstracts(pmids)
    citations = client.fetch_links(papers["id"].tolist())
    logger.info(f"{domain}: {len(pmids)} PMIDs found, {len(papers)} with abstract; skipped: {stats}; {len(citations)} "
                "links")
    return papers.assign(domain=domain), citations


def _parse(body: bytes, endpoint: str) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as error:
        raise PubMedError(f"malformed {endpoint} XML ({error})") from None


def _batches(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]
