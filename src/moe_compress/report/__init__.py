"""Reports: number formatting (`format`), the per-expert analysis (`analysis`), its plots
(`plots`), the single-page HTML report (`html`, built of `page`'s pieces, which fit's page shares),
and what `analyze` writes of them (`outputs`).

Submodules are imported where they are used: `format` is what the CLI needs at start-up, and
it imports nothing heavy.
"""
