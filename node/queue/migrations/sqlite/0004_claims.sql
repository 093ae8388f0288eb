-- How many times a job was claimed for analysis (Queue.claim): a job claimed again was held by a worker that never
-- finished it, and one claimed more than [inference] max_tries times fails instead of killing workers for ever.
ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
