package org.omi.fhirstore;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import javax.sql.DataSource;
import java.util.Properties;

/**
 * The Spring configuration of the JPA server: HAPI's own R4 configuration plus the beans it
 * expects the application to provide (database, entity manager, transactions, settings).
 * Settings come from {@link Settings#current()}, read by {@link FhirStoreMain}.
 */
@Configuration
// SubscriptionChannelConfig provides the in-memory message broker that batch jobs use
// (reindexing after a SearchParameter is added); subscriptions themselves are not enabled.
@Import({JpaR4Config.class, HapiJpaConfig.class, JpaBatch2Config.class, Batch2JobsConfig.class,
		SubscriptionChannelConfig.class, ThreadPoolFactoryConfig.class})
public class StoreConfig {

	@Bean
	public JpaStorageSettings storageSettings() {
		Settings s = Settings.current();
		JpaStorageSettings retVal = new JpaStorageSettings();
		// Results refer to the DIC's Patient by identifier and to Endpoints at the gateway.
		retVal.setAllowExternalReferences(true);
		retVal.setAutoCreatePlaceholderReferenceTargets(s.bool("placeholder.references", true));
		retVal.setAllowInlineMatchUrlReferences(true);
		retVal.setAllowMultipleDelete(false);
		retVal.setExpungeEnabled(s.bool("expunge", false));
		retVal.setDefaultSearchParamsCanBeOverridden(true);
		retVal.setIndexMissingFields(JpaStorageSettings.IndexEnabledEnum.DISABLED);
		// string :contains (the service registry's name:contains)
		retVal.setAllowContainsSearches(true);
		// A search answers from the database, never from an earlier search's cached result: a consent
		// withdrawn or a study's ImagingStudy created a moment ago must be found at once.
		retVal.setReuseCachedSearchResultsForMillis(null);
		return retVal;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Bean(destroyMethod = "close")
	public DataSource dataSource() throws Exception {
		Settings s = Settings.current();
		BasicDataSource ds = new BasicDataSource();
		ds.setUrl(s.require("db.url"));
		ds.setUsername(s.get("db.user", ""));
		ds.setPassword(s.secret("db.password.file"));
		ds.setMaxTotal(s.integer("db.pool", 10));
		ds.setMaxWait(java.time.Duration.ofSeconds(30));
		return ds;
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory, FhirContext fhirContext, JpaStorageSettings storage,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean retVal =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storage);
		retVal.setPersistenceUnitName("OMI_FHIR_STORE");
		retVal.setDataSource(dataSource);
		Properties p = new Properties();
		p.put("hibernate.dialect", Settings.current().dialect());
		p.put("hibernate.hbm2ddl.auto", "update");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_structured_entries", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		p.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		p.put("hibernate.search.enabled", "false");
		retVal.setJpaProperties(p);
		return retVal;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory emf) {
		JpaTransactionManager retVal = new JpaTransactionManager();
		retVal.setEntityManagerFactory(emf);
		return retVal;
	}
}
