"""Search: paper collections read in pieces (`collection`), a query's domain predicted (`domain_classifier`), and the
index, built by any number of processes and queried through the query's domain's expert (`index`)."""
