"""The operators' web console under /ui/ (issue 17): plain HTML and server-drawn SVG, served where
the admin API is (the private admin listener when [server] admin is set, else the HTTPS listener).

Sign-in: an admin client certificate (the admin API's rule, scepd.admin.http.authenticate), or an
admin token typed into a form, which yields a signed, expiring session cookie (scepd.console.session).
Every form carries a CSRF token. The pages only decode, authenticate and call the existing
services (inventory reads, EnrollmentService approvals, RevocationService, AgentInventory, audit).
"""
