/** The journal: entry point of the module. */
export * from './errors.js';
export * from './file-system.js';
export * from './file-store.js';
export * from './journal.js';
export * from './metadata.js';
export * from './pool.js';
export * from './record.js';
export * from './record-index.js';
export * from './scan.js';
export * from './view.js';
