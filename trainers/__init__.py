"""certtune trainer core: certified training (IBP, CROWN-IBP, the fast method) with no framework inside."""
