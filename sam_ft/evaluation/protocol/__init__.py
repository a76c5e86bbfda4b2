"""Running the study protocol: cases in, models run, rows scored and written."""
