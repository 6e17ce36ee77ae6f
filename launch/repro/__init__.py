"""`pope repro SUITE` and `pope repro report`: the paper's experiments as suites, run through the ordinary
`pope prep`, `pope train` and `pope eval` code, summarised into CSVs, tables and plots, and RESULTS.md.

- suites.py  what each suite trains (settings × seeds), its budgets (profiles cpu, gpu, smoke), the paper's claims
- data.py    each suite's corpus, prepared once through data_prep/
- runner.py  the grid: skip finished runs, resume unfinished ones, evaluate; here or as SLURM job arrays
- summary.py summary.csv, table.md, plots, meta.json per suite
- report.py  RESULTS.md from the summaries, with the paper's figures and a verdict per claim
"""
