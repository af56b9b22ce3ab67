"""What a study leaves: tables (CSV/HTML), the best configuration and its export, the dashboard."""
