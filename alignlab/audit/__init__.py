"""(experimental) Audits of a stage's data: `alignlab audit preferences` (command.py), the flip-rate fit (mixture.py)."""
