"""What a person can do to a study, from the CLI, the REST API or the UI, each audited in the
transaction that does it: re-run (:mod:`.rerun`), purge (:mod:`.purge`), and restore with
progress (:mod:`.restore`). Who did it comes as an :class:`~.models.Actor`."""
