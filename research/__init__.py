"""The validation study (`ivon-diag validate`, `make validate`): how faithful the LOO estimate and the sensitivities
are against retraining. Research, above the product: nothing in ivon_core, sensitivity, worker or app imports it;
it reuses the worker's models and data.
"""
