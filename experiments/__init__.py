"""Reference experiments for sharpax: models, input pipelines and the training CLI."""
