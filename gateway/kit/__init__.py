"""The plugin kit: the contracts plugins implement (Event, Source, Sink, PollingSource) and the tools they use.

Plugin authors import these names from `declic_gateway` itself; this folder is where they live.
"""
