# Stage file: synthesis (rules join as their issue lands).
