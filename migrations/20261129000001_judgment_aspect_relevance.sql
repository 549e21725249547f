-- One aspect type: judgments say 'relevance' where they said HPIR's
-- 'accuracy', as ratings and lmm.judgment.v1 events do (the judge's prompts
-- still ask for it as accuracy). The check is dropped, the rows renamed and
-- the new check added in the migration's one transaction. 'accuracy' stays
-- allowed for one release: an enricher of the previous release, still
-- running during a rolling deploy, writes it (readers take it as relevance);
-- a later migration renames such rows again and drops it.
ALTER TABLE lmm_judgments DROP CONSTRAINT lmm_judgments_aspect_check;
UPDATE lmm_judgments SET aspect = 'relevance' WHERE aspect = 'accuracy';
ALTER TABLE lmm_judgments
    ADD CONSTRAINT lmm_judgments_aspect_check CHECK (aspect IN ('relevance', 'aesthetic', 'accuracy'));
