"""The LLM stages of the method as GPU batch jobs: backtranslate, score, rewrite, distill, rate."""
