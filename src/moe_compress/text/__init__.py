"""Numbers and Markdown as people read them: byte and parameter counts, Markdown that strings from
elsewhere cannot break out of, and the tables a composition's report and the quality guard put
in a model card. Pure functions, no torch: the sink, the CLI and the reports all use them."""
