"""What Declic decided and did, for whom and why: the journal."""
