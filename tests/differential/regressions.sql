-- The differential test's kept cases (tests/tests/proxy/differential.rs): one query per line,
-- tried before the generated ones. Each must keep every relation the server plans to touch
-- among the relations pgiam's classifier finds. Add a query here once a disagreement is fixed.
WITH a(id, v) AS (SELECT id, v FROM b) SELECT id, v FROM a
WITH RECURSIVE x(id, v) AS (SELECT id, v FROM a UNION ALL SELECT id + 1, v FROM x WHERE id < 3) SELECT id, v FROM x
SELECT q.id, q.v FROM (WITH a(id, v) AS (SELECT id, v FROM s2.a) SELECT id, v FROM a) AS q, a
WITH x AS (SELECT id, v FROM a), a AS (SELECT id, v FROM x) SELECT id, v FROM a
WITH w AS (DELETE FROM b RETURNING id, v) SELECT id, v FROM w
WITH w AS (UPDATE s2.c SET v = 'x' RETURNING id, v) INSERT INTO "Mixed" SELECT id, v FROM w
INSERT INTO "Mixed" SELECT id, v FROM s2.c WHERE EXISTS (SELECT 1 FROM a)
UPDATE b SET v = (SELECT max(v) FROM s2.a) WHERE id IN (SELECT id FROM public.a)
DELETE FROM a USING b WHERE a.id = b.id RETURNING (SELECT count(*) FROM s2.c)
SELECT l.id, l.v FROM a, LATERAL (SELECT id, v FROM b WHERE b.id = a.id) AS l
SELECT id, v FROM a UNION SELECT id, v FROM b EXCEPT SELECT id, v FROM s2.a
