"""Data: tables on disk (`tables`), pair datasets bound to domains and the embedded sample (`pairs`), citation graphs
into co-citation pairs (`cocitation`), the PubMed client (`pubmed`) and the builds that write pair datasets with their
cards (`builds`)."""
