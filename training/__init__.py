"""Models of the method: seed data, tiny smoke-test models, fine-tuning, evaluation."""
