"""prepare() and what only it uses: the checks, where adapters go, the plan, the casts, the transaction, the report."""
