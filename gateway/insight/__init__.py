"""What Declic decided and did, for whom and why: the journal; and what it did, counted for Prometheus."""
