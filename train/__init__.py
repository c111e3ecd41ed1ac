"""Training pipeline: data, ETL, two-tower training, evaluation and export."""
