"""What each KL coefficient's optimum would do: :mod:`.core` (pure math) and :mod:`.stage`
(the pipeline stage that samples the reference on train prompts and writes the frontier)."""
