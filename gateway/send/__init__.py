"""One journey step at send time: re-checks, guard rails, rendering, the sink call and its outcome."""
