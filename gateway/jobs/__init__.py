"""The worker: claims due jobs (stored calls, journey steps, polls, clock ticks) and runs each through its stage."""
